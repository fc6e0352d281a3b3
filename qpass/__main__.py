from qpass.cli import main

main()

from robustbnn.cli import main

main()

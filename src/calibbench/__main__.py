from calibbench.cli import main

main()

from dori.cli import main

main()

from wnconvert.cli.main import main

main()

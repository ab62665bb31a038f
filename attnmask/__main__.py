from attnmask.cli import main

main()

from ahvbackup.core.cli import main

main()

from aquakv_cli.main import main

main()

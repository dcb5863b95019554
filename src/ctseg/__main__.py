from ctseg.cli import console_main

console_main()

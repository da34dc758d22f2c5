from onnxecc.cli import main

main()

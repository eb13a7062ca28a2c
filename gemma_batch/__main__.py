from gemma_batch.cli import main

main()

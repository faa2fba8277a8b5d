"""`python -m genedml` (also what `torchrun -m genedml` runs on every rank)."""

from genedml.cli import main

if __name__ == "__main__":
    main()

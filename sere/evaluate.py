"""`python -m sere.evaluate`: the same as `sere evaluate` (implemented in `sere.hf.evaluate`)."""

from sere.hf.evaluate import main

if __name__ == "__main__":
    main()

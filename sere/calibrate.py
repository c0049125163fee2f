"""`python -m sere.calibrate`: the same as `sere calibrate` (implemented in `sere.hf.calibrate`)."""

from sere.hf.calibrate import main

if __name__ == "__main__":
    main()

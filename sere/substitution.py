"""`python -m sere.substitution`: the same as `sere substitution` (implemented in `sere.hf.substitution`)."""

from sere.hf.substitution import main

if __name__ == "__main__":
    main()

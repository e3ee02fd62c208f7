"""`python -m stablexl ...`: the same CLI as the `stablexl` console script."""

if __name__ == "__main__":
    from .cli import main

    raise SystemExit(main())

"""``python -m mmoffload``: the same CLI as the ``mmoffload`` console script."""

from mmoffload_cli.app import main

if __name__ == "__main__":
    main()

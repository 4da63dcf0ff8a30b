"""Entry point for ``python -m proxy.demo``."""

from proxy.demo.backend import main

if __name__ == "__main__":
    main()

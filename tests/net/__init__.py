"""Network tests: the real proxy between real clients and real backends."""

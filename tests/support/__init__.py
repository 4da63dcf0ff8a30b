"""Helpers the test suite shares: free ports, a real proxy process, real backends."""

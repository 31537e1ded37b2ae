"""Small programs the tests run in their own processes."""

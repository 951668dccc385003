"""Development tools: test-model builder and shipped vocab files."""

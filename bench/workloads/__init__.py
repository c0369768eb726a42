"""One module per workload: NUMBER, TITLE, run(env) -> dict."""

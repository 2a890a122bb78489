"""Model code: plain single-device modules; parallelism is applied from outside."""

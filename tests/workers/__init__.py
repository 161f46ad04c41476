"""Scripts the tests run as separate processes (other vLLM servers on the same node)."""

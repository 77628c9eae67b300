"""Client-library integrations against real loopback upstreams."""

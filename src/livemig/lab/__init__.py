"""The test bed's own machinery: starting and supervising its hosts' daemons."""

"""Network shells (websocket client, small REST getter): thin I/O around the pure cores."""

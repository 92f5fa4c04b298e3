"""Running it: the `pipeline run` supervisor, health, systemd notification, CPU pinning."""

"""The daemon around it all: configuration, twistd integration, reload, lifecycle, logs, CLI."""

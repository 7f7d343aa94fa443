"""The daemon: twistd's side of heartbeatd, wiring the server to the operating system.

The twistd plugin (``twistd heartbeatd``) enters at `heartbeatd.daemon.tap`; the rest is
the service and its stop order, the YAML file, live reload, the admin API and its metrics,
sd_notify, signals, the log format, and the files an installation needs (`files`).
"""

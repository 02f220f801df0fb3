"""The SSH gateway: configuration, pod template, and (later) the SSH server and sessions.

``config`` loads and validates the ``kubernetes:`` section of the configuration file;
``podtemplate`` turns that configuration plus one SSH connection into a pod manifest.
"""

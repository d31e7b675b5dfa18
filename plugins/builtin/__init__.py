"""logferry's own plugins, registered exactly as third-party plugins are
(``plugins.manager.DEFAULT_PLUGINS``)."""

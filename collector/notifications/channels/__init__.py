"""The built-in notification channel plugins (email, sms, push, in_app), the
``notify`` pipeline step and the ``digest`` plugin. Each module is a pluggy
plugin listed in ``plugins.manager.DEFAULT_PLUGINS``, registered exactly as a
third party's would be."""

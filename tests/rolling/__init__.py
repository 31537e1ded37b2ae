"""The rolling-upgrade tests ' support: the previous release, its app, fresh namespaces."""

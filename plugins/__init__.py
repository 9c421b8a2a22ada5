"""Built-in rotation plugins, registered through the ``rotator.plugins`` entry-point group."""

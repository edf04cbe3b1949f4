# Kitchen suite "default": the formula's defaults.
mtproxy: {}

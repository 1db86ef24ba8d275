"""Models bedside builds itself: the demo repository, and later the reference clinical models."""

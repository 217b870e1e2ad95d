"""What the app shows, for many users at once: the shared model cache, the views, their figures."""

"""bedside past one box: the same repository served by Ray Serve replicas (`bedside cluster`)."""

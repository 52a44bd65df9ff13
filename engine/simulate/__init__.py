"""The simulated world of `reloop demo` and `reloop simulate`: users, items, a click model, drift."""

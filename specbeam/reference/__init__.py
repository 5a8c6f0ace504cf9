"""Plain torch versions of every specbeam kernel: readable, float64-capable, the test oracle."""

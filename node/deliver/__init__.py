"""Stage 5, deliver: one sender per destination kind behind one protocol, and the delivery lanes."""

"""Pure geometry: mesh I/O, repair, decomposition, mass properties, SDF writing. No sockets."""

"""Applications built on the library: the ``hbt`` command line, batch jobs and the demo.
The library never imports them."""

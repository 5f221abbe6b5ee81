//! Integration tests of gantry-server: added with the next commit.

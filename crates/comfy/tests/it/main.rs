//! Protocol tests: every frame and answer in the captures of a real ComfyUI parses into
//! the typed layer and serializes back to the same JSON, so nothing unknown is lost; and
//! no frame or answer, however broken, makes the parsers panic (`fuzz`).

mod captures;
mod fuzz;

"""Knowledge distillation (teacher -> compact student) and INT4 export. Not built yet: see the issues."""

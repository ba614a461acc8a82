// Filled in by the op family that owns it; see math.h / params.h.
#pragma once

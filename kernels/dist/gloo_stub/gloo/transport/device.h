// Part of the declaration stand-in for gloo (see decls.h).
#pragma once
#include "../decls.h"

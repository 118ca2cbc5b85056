// See README.md: included by ProcessGroupGloo.hpp, which needs nothing from it.
#pragma once

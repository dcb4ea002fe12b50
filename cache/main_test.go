package cache

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package's tests if a goroutine is still running once
// they are over.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

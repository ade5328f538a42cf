/* The benchmark floor's init: prints one line and resets the VM at once
 * (QEMU runs with -no-reboot, so the reset ends it). */
#include <stdio.h>
#include <sys/reboot.h>
#include <unistd.h>

int main(void)
{
	puts("trivial init");
	fflush(stdout);
	reboot(RB_AUTOBOOT);
	return 0;
}

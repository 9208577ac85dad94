/* A user's own workload for the custom-image test: a static TCP server on port 9000
 * that greets each connection with the contents of a file the user added too. */
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    char greeting[256] = "hello\n";
    FILE *f = fopen(argc > 1 ? argv[1] : "/etc/hello.txt", "r");
    if (f) {
        size_t n = fread(greeting, 1, sizeof greeting - 1, f);
        greeting[n] = '\0';
        fclose(f);
    }
    int s = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(9000)};
    if (s < 0 || bind(s, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(s, 16) < 0) {
        perror("hello");
        return 1;
    }
    for (;;) {
        int c = accept(s, NULL, NULL);
        if (c < 0)
            continue;
        if (write(c, greeting, strlen(greeting)) < 0)
            perror("hello: write");
        close(c);
    }
}
